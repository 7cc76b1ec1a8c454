"""Python-backend model sources for Triton; `ctjoint export repository` copies each one into
a model's version folder as `model.py` (they run inside Triton's python stub, not here)."""
