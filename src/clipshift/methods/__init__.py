"""The science as plain functions: zero-shot heads, fine-tuning, linear probe, k-NN,
baselines, WiSE-FT and soups, metrics, CLIP evaluation, robustness fits, scaling laws.

Nothing here knows about MLflow, Prefect or the stages' folder layout: stages (and users)
pass tensors, models and settings in and get numbers and models back.
"""
