// FG_HD marks functions shared by the CPU interpreter and CUDA kernels.
#pragma once
#ifdef __CUDACC__
#define FG_HD __host__ __device__
#else
#define FG_HD
#endif
