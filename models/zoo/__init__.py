"""Trained forecaster zoo: reproducible builders for small ONNX forecasters with rollout specs.

Build with ``python models/zoo/build_all.py [--only NAME]``; the committed artefacts are
``NAME.onnx``, ``NAME.rollout.json``, ``NAME_sweep.npz`` and ``NAME_eval.npz``.
"""
