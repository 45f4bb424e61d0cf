"""Hides torch from the stage processes the tests start (`tiny_ppo.env` puts this directory on
their PYTHONPATH, and Python imports `sitecustomize` at start-up).

Those processes then run as in the install the README's main command makes (`pip install -e .`:
no torch), not as in the test environment, which has torch only as the parity tests' reference.
transformers imports torch whenever it can, even to load a tokenizer: seconds per process.
A `None` entry makes `import torch` fail and `importlib.util.find_spec("torch")` answer None.
"""
import sys

sys.modules["torch"] = None
