"""preprocessing: text -> token ids with the engine's tokenizer; bad requests get a clear error.

The logic lives in `export.triton.pipeline.preprocess`; this file only adapts Triton's API.
The python stub ignores PYTHONPATH, so `export_root` (rendered at package time) goes on sys.path.
"""

import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT", "END_ID", "PAD_ID",
          "TEMPERATURE", "RUNTIME_TOP_K", "RUNTIME_TOP_P")


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.triton import pipeline, stub

        self.pipeline, self.stub = pipeline, stub
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        # max_input_bytes (optional parameter; default max_input_len x requests.BYTES_PER_TOKEN): a prompt
        # over it is refused before it is decoded or tokenized
        self.limits = pipeline.Limits(int(p["max_input_len"]), int(p["max_seq_len"]),
                                      int(p.get("max_input_bytes", "0") or 0))
        self.add_special = p.get("add_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = self.stub.gather(pb_utils, request, INPUTS)
            try:
                out = self.pipeline.preprocess(self.tokenizer, inputs, self.limits, self.add_special)
            except self.pipeline.RequestError as e:
                responses.append(self.stub.error(pb_utils, str(e)))
                continue
            responses.append(self.stub.response(pb_utils, out))
        return responses


def _params(args):
    """The model's parameters; first `export_root` (rendered by `package`) goes on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["export_root"]["string_value"]
    sys.path[:0] = [] if root in sys.path else [root]
    from export.triton.stub import model_params

    return model_params(args)
