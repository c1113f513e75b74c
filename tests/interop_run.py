"""Run in the separate environment of SAELens and circuit-tracer (tests/test_export.py builds it):
load each exported SAE or transcoder with that tool's own loader and write what it computes on the
given activations.

    python interop_run.py JOBS.json    JOBS: [{"tool": "saelens" | "circuit-tracer", "path": the export,
                                               "x": in.safetensors, "out": out.safetensors}]

out: "acts" (the tool's encode), "y_hat" (its forward), and in its metadata what it loaded as."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

with open(sys.argv[1]) as f:
    jobs = json.load(f)
for job in jobs:
    x = load_file(job["x"])["x"]
    if job["tool"] == "saelens":
        from sae_lens import SAE
        model = SAE.load_from_disk(job["path"], device="cpu")
        meta = {"architecture": model.cfg.architecture(), "hook_name": str(model.cfg.metadata.hook_name),
                "hook_name_out": str(getattr(model.cfg.metadata, "hook_name_out", None))}
    else:
        from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder
        model = load_relu_transcoder(job["path"], 1, device=torch.device("cpu"), dtype=torch.float32)
        meta = {"activation": type(model.activation_function).__name__, "skip": str(model.W_skip is not None)}
    with torch.no_grad():
        acts, y_hat = model.encode(x), model(x)
    save_file({"acts": acts.contiguous(), "y_hat": y_hat.contiguous()}, job["out"], metadata=meta)
