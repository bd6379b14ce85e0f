"""Triton Python-backend model written by `rwkv-deploy triton --backend python` (as <model>/1/model.py).

Runs the export folder beside it (1/export/) with rwkv-deploy's ONNX Runtime Session; each sequence's state is
kept under its correlation id (rwkv_deploy.triton.sequences). A request carries tokens [1, T]: T = 1 is one
decode step, T > 1 a prompt (run in one call with the prefill graph when the export has one). The response is
the logits of the last token. The server's Python needs rwkv-deploy (no torch: `pip install --no-deps
rwkv-deploy`), onnxruntime, numpy and jsonschema.
"""
import json
import locale
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# The backend's embedded interpreter starts in the C locale whatever the environment says, and then reads text
# files as ASCII; rwkv-deploy's JSON files (the manifest schema) are UTF-8.
try:
    locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
except locale.Error:
    pass

from rwkv_deploy.runtime.session import OnnxSession  # noqa: E402 (after the locale)
from rwkv_deploy.triton.sequences import Request, SequenceTable  # noqa: E402


def _control(request, name: str) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return int(tensor.as_numpy().reshape(-1)[0]) if tensor is not None else 0


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / params["export"]
        providers = "cpu"
        if args.get("model_instance_kind") == "GPU":  # KIND_GPU instance: onnxruntime-gpu on that device
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                         "CPUExecutionProvider"]
        self.session = OnnxSession(folder, providers, int(params.get("threads") or 0) or None,
                                   trust_custom_ops=params.get("trust_custom_ops") == "true")
        graph = self.session.manifest.graph("step")
        self.tokens, self.logits = graph["tokens"], graph["logits"]
        self.table = SequenceTable(self.session, float(params["idle_seconds"]))

    def execute(self, requests):
        batch = [Request(corrid=_control(r, "CORRID"), start=bool(_control(r, "START")),
                         end=bool(_control(r, "END")),
                         tokens=pb_utils.get_input_tensor_by_name(r, self.tokens).as_numpy().reshape(-1))
                 for r in requests]
        responses = []
        for result in self.table.run(batch):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                logits = np.ascontiguousarray(result[None], dtype=np.float32)  # [1, V]: this request's row
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.logits, logits)]))
        return responses
