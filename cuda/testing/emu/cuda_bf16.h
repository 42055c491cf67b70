// swarmtune CUDA emulator: <cuda_bf16.h> (the bfloat16 type and conversions live in stc_emu.h).
#pragma once
#include "stc_emu.h"
