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
        from export.triton import pipeline, stub

        self.pipeline, self.stub = pipeline, stub
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.skip = p.get("skip_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = self.stub.gather(pb_utils, request, INPUTS)
            try:
                out = self.pipeline.postprocess(self.tokenizer, inputs, self.skip)
            except Exception as e:  # a decoding failure belongs to this request only
                responses.append(self.stub.error(pb_utils, str(e), None))
                continue
            responses.append(self.stub.response(pb_utils, out))
        return responses
