"""TensorRT engines: build specs, building, manifests, and refusing engines that do not fit."""
