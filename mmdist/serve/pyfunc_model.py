"""MLflow "model from code": the pyfunc that wraps an mmdist model directory.

MLflow stores this file's source, not a pickled object; loading runs it and calls
``load_context``, which reads safetensors weights. Input: a DataFrame with any of the columns
``text`` (str), ``image``, ``audio`` and ``video`` (a file path or the file's bytes). Output: a DataFrame
with the task's answer per row (see ``mmdist.serve.predictor.Predictor.predict_frame``).
"""

import mlflow
from mlflow.pyfunc import PythonModel

from mmdist.serve.predictor import Predictor


class MmdistPyfunc(PythonModel):
    def load_context(self, context):
        self.predictor = Predictor.from_dir(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        return self.predictor.predict_frame(model_input)


mlflow.models.set_model(MmdistPyfunc())
