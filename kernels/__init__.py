"""Fast fused versions of hot pure/ ops, each with a plain-torch reference and a dispatcher.

This package is puretune's, not the Hugging Face `kernels` hub package: it defines no
`__version__`, so transformers' probe (`is_kernels_available`) never takes it for that one.
"""
