"""Code that runs without sidetune: torch and transformers only, relative imports only.

`sidetune export RUN --hf OUT` copies `modeling_sidetune.py` and the modules it imports from here into OUT, where
`AutoModelFor*.from_pretrained(OUT, trust_remote_code=True)` loads them in a Python without sidetune. The training
code imports the same modules (LST's side network, the adapters' bottleneck), so the exported model runs the very
code the run trained with. Nothing in this package may import sidetune or a package transformers does not need.
"""
