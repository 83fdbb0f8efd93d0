"""Backbones that timm does not provide in the form the published recipes use: SegFormer's Mix Transformer (MiT-B0…B5)
and the caffe-style DeepLabV2 ResNet-101."""
