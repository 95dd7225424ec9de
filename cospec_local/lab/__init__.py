"""The lab: what measures and trains the runtime, never imported by it.

- `testworld/`: the synthetic task family (tasks, tiny llama models, their GGUF export, headroom);
- `training`: the CoSpec arbitration policy (supervised start, RL, ONNX export);
- `evaluate`: final-answer accuracy of decoding modes on test-world problems;
- `bench`: speed of the decoding modes on one pair, with the formulas that predict it.
"""
