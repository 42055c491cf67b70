// swarmtune CUDA emulator: <mma.h> (nvcuda::wmma lives in stc_emu.h).
#pragma once
#include "stc_emu.h"
