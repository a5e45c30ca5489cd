"""postprocessing: token ids -> text (incremental when the engine sends GENERATED_IDS).

The logic lives in `export.triton.pipeline.postprocess`; this file only adapts Triton's API.
"""

import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("TOKENS_BATCH", "SEQUENCE_LENGTH", "GENERATED_IDS", "IS_FINAL", "REQUEST_KEY")


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.triton import pipeline, stub

        self.pipeline, self.stub = pipeline, stub
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.skip = p.get("skip_special_tokens", "true").lower() == "true"
        self.vocab = int(p.get("vocab_size", "0")) or None  # the model's (it may exceed the tokenizer's)
        self.engine_name = p.get("tensorrt_llm_model_name", "tensorrt_llm")

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = self.stub.gather(pb_utils, request, INPUTS)
            if request.is_cancelled():  # the ensemble's client left: stop the engine's request too
                self._stop_engine(inputs["REQUEST_KEY"])
                # no text rather than an error: tritonserver 2.51 never released an ensemble request
                # whose cancelled step answered with an error, and then timed out at shutdown
                responses.append(self.stub.response(pb_utils, self.pipeline.no_text(inputs)))
                continue
            try:
                out = self.pipeline.postprocess(self.tokenizer, inputs, self.skip, vocab=self.vocab)
            except self.pipeline.RequestError as e:  # ids outside the vocabulary, lengths outside the tensor
                responses.append(self.stub.error(pb_utils, str(e)))
                continue
            except Exception as e:  # a decoding failure belongs to this request only
                responses.append(self.stub.error(pb_utils, str(e), None))
                continue
            responses.append(self.stub.response(pb_utils, out))
        return responses

    def _stop_engine(self, key):
        if key is None:  # TensorRT-LLM's own engine sends no key
            return
        try:
            self.stub.stop_engine(pb_utils, self.engine_name, self.pipeline.stop_id(int(key.reshape(-1)[0])))
        except Exception as e:  # the request is gone either way; say why the slot may stay busy
            pb_utils.Logger.log_warn(f"postprocessing: could not stop the engine's request: {e}")


def _params(args):
    """The model's parameters; first `export_root` (rendered by `package`) goes on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["export_root"]["string_value"]
    sys.path[:0] = [] if root in sys.path else [root]
    from export.triton.stub import model_params

    return model_params(args)
