"""tensorrt_llm (cpu flavour): the reference runtime's Engine behind TensorRT-LLM's tensor API.

Decoupled: `execute` hands each request to its own thread, which streams engine steps as
responses. `Engine.start` launches the TP worker processes with subprocess (multiprocessing does
not work inside the python-backend stub); `finalize` closes them.
"""

import contextlib
import json
import sys
import threading

import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "input_lengths", "request_output_len", "end_id", "pad_id", "stop_words_list",
          "bad_words_list", "temperature", "runtime_top_k", "runtime_top_p", "seed", "streaming")


def _params(args):
    cfg = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    if params["export_root"] not in sys.path:
        sys.path.insert(0, params["export_root"])
    return params


def _error(msg, invalid=True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    err = pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class TritonPythonModel:
    def initialize(self, args):
        p = _params(args)
        from pathlib import Path

        import torch

        torch.set_num_threads(1)
        from export.runtime.engine import Engine
        from export.triton import pipeline

        self.pipeline = pipeline
        self.max_seq_len = int(p["max_seq_len"])
        # ---- runtime switch (issue 9, ONNX flavour): `package --backend onnx` renders runtime "onnx" ----
        if p.get("runtime", "torch") == "onnx":  # engines/NAME/onnx by ONNX Runtime (tp=1, fp32, 1 thread)
            start = {"runtime": "onnx"}
        else:
            start = {"tp": int(p["tp"]), "pp": int(p["pp"]), "dtype": p["dtype"]}
        self.engine = Engine.start(Path(p["checkpoint_dir"]), **start)
        # ---- end runtime switch ----
        self.runner = pipeline.EngineRunner(self.engine)
        self.threads = set()

    def execute(self, requests):
        for request in requests:
            t = threading.Thread(target=self._serve, args=(request,), daemon=True)
            self.threads.add(t)
            t.start()
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else t.as_numpy()
            req = self.pipeline.engine_request(inputs, self.max_seq_len)
            with contextlib.closing(self.runner.steps(req)) as steps:  # closing frees the engine for the next
                for step in steps:
                    if sender.is_cancelled():
                        break
                    out = self.pipeline.engine_outputs(step)
                    response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()])
                    sender.send(response, flags=final if step.final else 0)
                    if step.final:
                        return
            sender.send(flags=final)
        except self.pipeline.RequestError as e:
            sender.send(_error(str(e)), flags=final)
        except Exception as e:  # an engine failure ends this request, not the server
            sender.send(_error(f"engine error: {type(e).__name__}: {e}", invalid=False), flags=final)
        finally:
            self.threads.discard(threading.current_thread())

    def finalize(self):
        for t in list(self.threads):
            t.join(timeout=10)
        self.engine.close()
