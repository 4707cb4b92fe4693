"""Glue between hf-clinic and transformers / Accelerate."""
