"""Decode heads of the published recipes: DAFormer's context-aware fusion head and the DeepLabV2 ASPP classifier."""
