"""tensorrt_llm_bls: preprocessing -> tensorrt_llm as BLS calls, detokenizing incrementally here.

It keeps every generated id of a request, so streamed text keeps spaces and multi-byte
characters whichever engine flavour answers (TensorRT-LLM streams only the new tokens).

Every stream ends with a final response. A pump thread reads the engine's responses into a queue
and the request's thread waits on it in POLL_S slices, so it is never stuck inside Triton's
response iterator: a client cancel stops the engine's request and ends the stream (after at most
DRAIN_S for the engine to confirm), `finalize` ends it with an error, and an engine error ends it
with that error. With the cpu engine errors arrive in-band (`error_message`; 2.51's iterator
drops a decoupled model's error responses), and a stream that ends without the engine's
`is_final` response is an error too, never a short answer that looks complete.
"""

import json
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# client input -> (preprocessing input, engine input); None: not sent there.
ROUTES = {"text_input": ("QUERY", None), "max_tokens": ("REQUEST_OUTPUT_LEN", None),
          "bad_words": ("BAD_WORDS_DICT", None), "stop_words": ("STOP_WORDS_DICT", None),
          "end_id": ("END_ID", None), "pad_id": ("PAD_ID", None), "top_k": ("RUNTIME_TOP_K", "runtime_top_k"),
          "top_p": ("RUNTIME_TOP_P", "runtime_top_p"), "temperature": ("TEMPERATURE", "temperature"),
          "seed": (None, "seed"), "stream": (None, "streaming")}
POLL_S = 0.1   # how often a waiting stream looks at its client's cancel flag and at shutdown
DRAIN_S = 2.0  # after a cancel, how long the engine gets to confirm the stop before the stream ends anyway
END = object()  # the pump's "no more responses"
# preprocessing output -> engine input
PRE_TO_ENGINE = {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths",
                 "REQUEST_OUTPUT_LEN": "request_output_len", "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id",
                 "STOP_WORDS_IDS": "stop_words_list", "BAD_WORDS_IDS": "bad_words_list"}


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from export.runtime import detok
        from export.triton import pipeline, stub

        self.detok, self.stub, self.pipeline = detok, stub, pipeline
        self.tokenizer = pipeline.load_tokenizer(p["tokenizer_dir"])
        self.skip = p.get("skip_special_tokens", "true").lower() == "true"
        self.engine_name = p.get("tensorrt_llm_model_name", "tensorrt_llm")
        self.cpu_engine = _is_cpu_engine(Path(args["model_repository"]).parent / self.engine_name)
        self.stopping = threading.Event()
        self.threads = set()

    def execute(self, requests):
        for request in requests:
            self.stub.serve_in_thread(self._serve, request, self.threads)
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
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        self.stopping.set()  # streams still waiting end with an error within POLL_S
        for t in list(self.threads):
            t.join(timeout=5)

    def _pump(self, engine_request):
        """The engine's responses, read by a thread of their own into a queue (then END)."""
        items = queue.SimpleQueue()

        def run():
            try:
                for r in engine_request.exec(decoupled=True):
                    items.put(r)
            except Exception as e:
                items.put(e)
            finally:
                items.put(END)

        threading.Thread(target=run, name="bls-responses", daemon=True).start()
        return items

    def _responses(self, items, request, rid, state):
        """Yield the engine's responses until its last; stop on a cancel or shutdown (see module doc)."""
        drain_until = None
        while True:
            try:
                item = items.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            if self.stopping.is_set():
                raise pb_utils.TritonModelException("server shutting down: the request was not completed")
            if drain_until is None and request.is_cancelled():  # our client left: stop the engine's request
                state["cancelled"] = True
                drain_until = time.monotonic() + DRAIN_S
                self._stop_engine(rid)
            if item is END or (drain_until is not None and time.monotonic() > drain_until):
                return
            if isinstance(item, Exception):
                raise item
            if item is not None and drain_until is None:
                yield item

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
        rid = f"{self.pipeline.IN_BAND_PREFIX}{uuid.uuid4().hex}"  # so a cancel can name it; errors in-band
        outputs = ["output_ids", "sequence_length"] + (["is_final", "error_message"] if self.cpu_engine else [])
        items = self._pump(pb_utils.InferenceRequest(model_name=self.engine_name, inputs=engine_inputs,
                                                     request_id=rid, requested_output_names=outputs))
        stream = client["stream"] is not None and bool(client["stream"].as_numpy().reshape(-1)[0])
        decoder = self.detok.IncrementalDecoder(self.tokenizer, self.skip)
        pieces, count = [], 0
        state = {"cancelled": False, "final": False}
        for r in self._responses(items, request, rid, state):
            if r.has_error():
                raise pb_utils.TritonModelException(r.error().message())
            err = pb_utils.get_output_tensor_by_name(r, "error_message")
            if err is not None:
                raise pb_utils.TritonModelException(_text(err))
            fin = pb_utils.get_output_tensor_by_name(r, "is_final")
            state["final"] |= fin is not None and bool(fin.as_numpy().reshape(-1)[0])
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
        if state["cancelled"]:
            return
        if self.cpu_engine and not state["final"]:
            raise pb_utils.TritonModelException("engine error: the engine's stream ended without its final response")
        tail = decoder.finish()
        if stream and tail:
            self._send(sender, tail, 0)
        if not stream:  # exactly one response, as HTTP /generate requires
            self._send(sender, "".join(pieces) + tail, count)

    def _stop_engine(self, rid):
        try:
            self.stub.stop_engine(pb_utils, self.engine_name, rid)
        except Exception as e:  # the stream ends either way; say why the engine's slot may stay busy
            pb_utils.Logger.log_warn(f"tensorrt_llm_bls: could not stop the engine's request: {e}")

    def _send(self, sender, text, n_tokens):
        sender.send(pb_utils.InferenceResponse([
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("num_output_tokens", np.array([[n_tokens]], dtype=np.int32))]))


def _is_cpu_engine(engine_dir):
    """The cpu flavour's config has `error_message` / `is_final`; TensorRT-LLM's C++ backend has
    neither, and requesting an output a model does not have is an error."""
    try:
        return 'name: "error_message"' in (engine_dir / "config.pbtxt").read_text()
    except OSError:
        return False


def _text(tensor):
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _params(args):
    """The model's parameters; first `export_root` (rendered by `package`) goes on sys.path."""
    root = json.loads(args["model_config"])["parameters"]["export_root"]["string_value"]
    sys.path[:0] = [] if root in sys.path else [root]
    from export.triton.stub import model_params

    return model_params(args)
