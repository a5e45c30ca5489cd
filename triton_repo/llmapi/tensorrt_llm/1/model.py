"""tensorrt_llm (llmapi layout, cpu implementation): TensorRT-LLM's Triton LLM-API model interface on our Engine.

Upstream's model (triton_backend/all_models/llmapi/tensorrt_llm/1/model.py) builds `tensorrt_llm.LLM`
from this directory's model.yaml (every key but `triton_config`, or the file LLM_CONFIG_PATH names) and
answers each request with `text_output` (the text generated so far, cumulative also when streaming) and
the optional outputs the request asks for (`return_finish_reason`, `return_stop_reason`). This model reads
the same model.yaml keys and answers the same way, running `export.runtime.engine.Engine.start(model,
tp=tensor_parallel_size, pp=pipeline_parallel_size)` on the HF checkpoint: each request streams from its own
thread and all of them share the engine's in-flight batching scheduler (`max_batch_size` running). A
client cancel, or a request with the same request id and `stop` = true, ends the request (as upstream:
the stop request is answered with a CANCELLED error). On a GPU host, upstream's model.py and helpers.py
replace this file; model.yaml and config.pbtxt stay. A TP worker's death fails every request and
stops tritonserver (export.triton.health.EngineWatchdog, as the cpu engine model).
"""

import json
import os
import sys
import threading

import triton_python_backend_utils as pb_utils


def _llm_config(args):
    path = os.environ.get("LLM_CONFIG_PATH") or os.path.join(args["model_repository"], args["model_version"],
                                                             "model.yaml")
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        root = cfg["parameters"]["export_root"]["string_value"]
        if root not in sys.path:
            sys.path.insert(0, root)
        from pathlib import Path

        import torch

        from export.runtime.detok import stable_text
        from export.runtime.engine import Engine
        from export.runtime.scheduler import BusyError
        from export.triton import llmapi, pipeline, stub

        torch.set_num_threads(1)
        sys.setswitchinterval(0.0005)  # see the cpu engine model: request threads share the driver's GIL
        self.llmapi, self.pipeline, self.stub, self.BusyError = llmapi, pipeline, stub, BusyError
        self.stable_text = stable_text
        conf = _llm_config(args)
        if conf.get("backend", "pytorch") != "pytorch":
            raise pb_utils.TritonModelException(f"model.yaml backend {conf.get('backend')!r}: only 'pytorch' here")
        self.decoupled = bool(conf["triton_config"]["decoupled"])
        model = Path(conf["model"])
        self.tokenizer = pipeline.load_tokenizer(str(model))
        self.engine = Engine.start(model, tp=int(conf.get("tensor_parallel_size", 1)),
                                   pp=int(conf.get("pipeline_parallel_size", 1)),
                                   max_batch=int(conf["max_batch_size"]), max_seq_len=int(conf["max_seq_len"]))
        self.runner = pipeline.EngineRunner(self.engine)
        from export.triton.health import EngineWatchdog

        self.health = EngineWatchdog(self.engine, pb_utils.Logger.log_error)  # a dead TP worker stops the server
        self.lock = threading.Lock()
        self.threads = set()
        self.stops = {}  # request id -> stop events of its running requests

    def execute(self, requests):
        for request in requests:
            if self.health.down is not None:
                self._send_error(request.get_response_sender(), f"Error generating request: {self.health.down}",
                                 "UNAVAILABLE")
                continue
            self.stub.serve_in_thread(self._serve, request, self.threads)
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        rid, stop = request.request_id(), threading.Event()
        try:
            inputs = self.stub.gather(pb_utils, request, self.llmapi.INPUTS)
            if inputs["stop"] is not None and bool(inputs["stop"].reshape(-1)[0]):
                self._stop(rid, sender)
                return
            req, out_cfg, stops = self.llmapi.llmapi_request(inputs, self.tokenizer, self.engine.max_seq_len)
            if req.streaming and not self.decoupled:
                raise self.pipeline.RequestError("Streaming is only supported in decoupled mode.")
            if rid:
                with self.lock:
                    self.stops.setdefault(rid, []).append(stop)
            cancelled = lambda: stop.is_set() or sender.is_cancelled()  # noqa: E731
            steps = self.runner.steps(req, cancelled)
            try:
                for step in steps:
                    text = self.stable_text(self.tokenizer, step.generated, step.final)
                    done = step.final
                    reason = self.llmapi.finish_reason(step.generated, req) if done else None
                    why = self.llmapi.stop_reason(step.generated, req, stops) if done else None
                    out = self.llmapi.llmapi_outputs(text, out_cfg, reason, why)
                    sender.send(self.stub.response(pb_utils, out), flags=final if done else 0)
                    if done:
                        return
            finally:
                steps.close()  # cancels the engine's request if it is still running
            self._send_error(sender, "Request cancelled by client", "CANCELLED")
        except self.pipeline.RequestError as e:
            self._send_error(sender, f"Error generating request: {e}", "INVALID_ARG")
        except self.BusyError as e:
            self._send_error(sender, f"Error generating request: {e}", "UNAVAILABLE")
        except Exception as e:  # an engine failure ends this request, not the server
            self._send_error(sender, f"Error generating request: {type(e).__name__}: {e}", None)
        finally:
            self.threads.discard(threading.current_thread())
            with self.lock:
                if stop in self.stops.get(rid, ()):
                    self.stops[rid].remove(stop)
                    if not self.stops[rid]:
                        del self.stops[rid]

    def _stop(self, rid, sender):
        """Upstream's handle_stop_request: end the running requests with this id; answer CANCELLED."""
        if not rid:
            self._send_error(sender, "A request id must be provided for request cancellation", "INVALID_ARG")
            return
        with self.lock:
            for event in self.stops.get(rid, ()):
                event.set()
        self._send_error(sender, "Request cancelled by client", "CANCELLED")

    def _send_error(self, sender, msg, code):
        """Upstream's error response: `text_output` "N/A" with the error, final."""
        outputs = self.llmapi.llmapi_outputs("N/A", self.llmapi.OutputConfig(), None, None)
        sender.send(self.stub.error(pb_utils, msg, code, outputs), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.health.close()
        self.engine.scheduler.close()  # requests still running or waiting end with an error now
        for t in list(self.threads):
            t.join(timeout=10)
        self.engine.close()
