// The CUDA emulation's stand-in for <cuda_runtime.h> (see ../cudaEmulation.h).
#pragma once
#include "cudaEmulation.h"
