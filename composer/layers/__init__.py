"""Torch modules behind the ops (imported by `build` only)."""
