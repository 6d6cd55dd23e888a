"""Serving with Triton Inference Server: ``mra-export triton`` writes a model repository.

- ``arguments``: the command's arguments and choices (light, for the command line's help).
- ``triton``: the repository writer (onnxruntime, tensorrt or python backend; tokenizer and
  ensemble where the export has tokenizer files).
- ``schema``: every config.pbtxt checked against Triton's ``model_config.proto``.
- ``triton_model`` / ``python_backend``: the python backend's model.py and what it runs.
- ``server``: the tritonserver of ``make triton-server`` on 127.0.0.1 (tests, tools, users).
- ``load``: concurrent clients against a served model, for the tests and tools/triton_load.py.
"""
