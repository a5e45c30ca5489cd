"""postprocessing: token ids -> text (incremental when the engine sends GENERATED_IDS).

The logic lives in `export.triton.pipeline.postprocess`; this file only adapts Triton's API.
"""

import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("TOKENS_BATCH", "SEQUENCE_LENGTH", "GENERATED_IDS", "IS_FINAL")


def _params(args):
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    if params["export_root"] not in sys.path:
        sys.path.insert(0, params["export_root"])
    return params


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.triton import pipeline

        self.pipeline = pipeline
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.skip = p.get("skip_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else t.as_numpy()
            try:
                out = self.pipeline.postprocess(self.tokenizer, inputs, self.skip)
            except Exception as e:  # a decoding failure belongs to this request only
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
