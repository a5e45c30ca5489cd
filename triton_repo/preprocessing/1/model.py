"""preprocessing: text -> token ids with the engine's tokenizer; bad requests get a clear error.

The logic lives in `export.triton.pipeline.preprocess`; this file only adapts Triton's API.
The python stub ignores PYTHONPATH, so `export_root` (rendered at package time) goes on sys.path.
"""

import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT", "END_ID", "PAD_ID",
          "TEMPERATURE", "RUNTIME_TOP_K", "RUNTIME_TOP_P")


def _params(args):
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    if params["export_root"] not in sys.path:
        sys.path.insert(0, params["export_root"])
    return params


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.triton import pipeline

        self.pipeline = pipeline
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.limits = pipeline.Limits(int(p["max_input_len"]), int(p["max_seq_len"]))
        self.add_special = p.get("add_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else t.as_numpy()
            try:
                out = self.pipeline.preprocess(self.tokenizer, inputs, self.limits, self.add_special)
            except self.pipeline.RequestError as e:
                responses.append(_error(str(e)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
