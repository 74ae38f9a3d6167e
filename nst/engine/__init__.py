"""The engine: one pair's image optimised against VGG features and Gram matrices (Gatys et al.).

`stylizer.Stylizer` is its door; this package imports nothing, so planning code can import its torch-free modules
(`images`, `pairs`, `memory`) without torch.
"""
