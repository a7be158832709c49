// Stand-in for cuda_runtime.h in the CPU emulation (see emulation.h).
#pragma once

#include "emulation.h"
