"""Loss and fusion modules of the distillation methods, usable without a trainer."""
