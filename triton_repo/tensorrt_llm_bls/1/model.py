"""tensorrt_llm_bls: preprocessing -> tensorrt_llm as BLS calls, detokenizing incrementally here.

It keeps every generated id of a request, so streamed text keeps spaces and multi-byte
characters whichever engine flavour answers (TensorRT-LLM streams only the new tokens).
"""

import json
import sys
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

# client input -> (preprocessing input, engine input); None: not sent there.
ROUTES = {"text_input": ("QUERY", None), "max_tokens": ("REQUEST_OUTPUT_LEN", None),
          "bad_words": ("BAD_WORDS_DICT", None), "stop_words": ("STOP_WORDS_DICT", None),
          "end_id": ("END_ID", None), "pad_id": ("PAD_ID", None), "top_k": ("RUNTIME_TOP_K", "runtime_top_k"),
          "top_p": ("RUNTIME_TOP_P", "runtime_top_p"), "temperature": ("TEMPERATURE", "temperature"),
          "seed": (None, "seed"), "stream": (None, "streaming")}
# preprocessing output -> engine input
PRE_TO_ENGINE = {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths",
                 "REQUEST_OUTPUT_LEN": "request_output_len", "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id",
                 "STOP_WORDS_IDS": "stop_words_list", "BAD_WORDS_IDS": "bad_words_list"}


def _params(args):
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    if params["export_root"] not in sys.path:
        sys.path.insert(0, params["export_root"])
    return params


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.triton import detok, pipeline, stub

        self.detok, self.stub = detok, stub
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.skip = p.get("skip_special_tokens", "true").lower() == "true"
        self.engine_name = p.get("tensorrt_llm_model_name", "tensorrt_llm")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            self._run(request, sender)
            sender.send(flags=final)
        except pb_utils.TritonModelException as e:
            sender.send(self.stub.error(pb_utils, str(e)), flags=final)
        except Exception as e:
            sender.send(self.stub.error(pb_utils, f"{type(e).__name__}: {e}"), flags=final)

    def _run(self, request, sender):
        client = {name: pb_utils.get_input_tensor_by_name(request, name) for name in ROUTES}
        pre_inputs = [pb_utils.Tensor(pre, t.as_numpy()) for name, (pre, _) in ROUTES.items()
                      if pre and (t := client[name]) is not None]
        pre = pb_utils.InferenceRequest(model_name="preprocessing", inputs=pre_inputs,
                                        requested_output_names=list(PRE_TO_ENGINE)).exec()
        if pre.has_error():
            raise pb_utils.TritonModelException(pre.error().message())
        engine_inputs = [pb_utils.Tensor(eng, pb_utils.get_output_tensor_by_name(pre, name).as_numpy())
                         for name, eng in PRE_TO_ENGINE.items()]
        engine_inputs += [pb_utils.Tensor(eng, t.as_numpy()) for name, (_, eng) in ROUTES.items()
                          if eng and (t := client[name]) is not None]
        rid = f"bls-{uuid.uuid4().hex}"  # so a cancel can name this engine request
        responses = pb_utils.InferenceRequest(model_name=self.engine_name, inputs=engine_inputs, request_id=rid,
                                              requested_output_names=["output_ids", "sequence_length"]
                                              ).exec(decoupled=True)
        stream = client["stream"] is not None and bool(client["stream"].as_numpy().reshape(-1)[0])
        decoder = self.detok.IncrementalDecoder(self.tokenizer, self.skip)
        pieces, count = [], 0
        stopped = False
        for r in responses:
            if not stopped and request.is_cancelled():  # our client left: stop the engine's request, drain
                stopped = True
                self._stop_engine(rid)
            if stopped:
                continue
            if r.has_error():
                raise pb_utils.TritonModelException(r.error().message())
            out = pb_utils.get_output_tensor_by_name(r, "output_ids")
            if out is None:  # the flag-only final response
                continue
            n = int(pb_utils.get_output_tensor_by_name(r, "sequence_length").as_numpy().reshape(-1)[0])
            new = out.as_numpy().reshape(-1)[:n].tolist()
            text = decoder.push(new)
            if stream and (text or new):
                self._send(sender, text, len(new))
            pieces.append(text)
            count += len(new)
        if stopped:
            return
        tail = decoder.finish()
        if stream and tail:
            self._send(sender, tail, 0)
        if not stream:  # exactly one response, as HTTP /generate requires
            self._send(sender, "".join(pieces) + tail, count)

    def _stop_engine(self, rid):
        self.stub.stop_engine(pb_utils, self.engine_name, rid)

    def _send(self, sender, text, n_tokens):
        sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("num_output_tokens", np.array([[n_tokens]], dtype=np.int32))]))
