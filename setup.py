from setuptools import find_packages, setup

setup(
    name="nnunet-kd",
    version="0.1.0",
    description="Knowledge distillation for brain-tumour MRI segmentation as nnU-Net v2 trainers "
                "(MTCM-KD, MGSD), with a BraTS converter for every release.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_kd", "nnunet_kd.*"]),
    install_requires=[
        "nnunetv2==2.8.1",
        "torch>=2.1",
        # timm (pulled by nnunetv2) imports torchvision; it must match the installed torch build.
        "torchvision",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "dynamic-network-architectures>=0.4",
        "numpy>=1.24",
        "tqdm",
        "matplotlib",
        "MedPy>=0.5",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # The official BraTS 2023+ lesion-wise metrics (nnunet_kd_evaluate --metrics lesionwise|both).
        # Pinned: the adapter reads this version's parser output (evaluation/lesionwise.py). panoptica 2.1.x
        # caps numpy<2.3, pandas<3, rich<14 and connected-components-3d<4 (nnunetv2 2.8.1 caps none of
        # them), so in an environment with newer ones this extra downgrades them; see README.
        "brats-eval": ["BraTS-evaluation==0.0.10", "panoptica==2.1.7"],
    },
    entry_points={
        "console_scripts": [
            "nnunet_kd_env=nnunet_kd.paths:main",
            "nnunet_kd_convert_brats=nnunet_kd.conversion.cli:main",
            "nnunet_kd_predict=nnunet_kd.inference.predict:main",
            "nnunet_kd_evaluate=nnunet_kd.evaluation.evaluate_cli:main",
            "nnunet_kd_evaluate_missing=nnunet_kd.evaluation.missing_modalities:main",
            "nnunet_kd_demo=nnunet_kd.experiments.demo:main",
            "nnunet_kd_synthetic=nnunet_kd.experiments.synthetic:main",
            "nnunet_kd_study=nnunet_kd.experiments.study.cli:main",
            "nnunet_kd_benchmark=nnunet_kd.experiments.benchmark.cli:main",
        ]
    },
)
