"""shopstream export: a trained model to a served artifact (ONNX + manifest)."""
