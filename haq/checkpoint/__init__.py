"""Checkpoints on disk: the haq int8 format (`native`), the compressed-tensors export, and the
checked weights reader both share (`weights`)."""
