// The CUDA emulation's stand-in for <cuda_runtime_api.h>, which TensorRT's headers include for
// cudaStream_t and cudaEvent_t (see ../cudaEmulation.h).
#pragma once
#include "cudaEmulation.h"
