"""Training code for ALBEF (kept apart from the modeling code, which never imports it): data loading and
augmentation, collators, accelerate pre-training, Trainer fine-tuning, metrics."""
