/* The counter-based noise of grid.uniform_noise, shared by every C kernel that rounds stochastically
   (kernels.c, the formats kernel in quant/formats/kernel.py). */
#ifndef FQTRUN_NOISE_H
#define FQTRUN_NOISE_H
#include <stdint.h>

/* grid.uniform_noise of flat element i < 2^32: lowbias32(i ^ k1) ^ k2, top 24 bits times 2^-24
   (32-bit arithmetic: the int64 form keeps only the low 32 bits of every product). */
/* lowbias32's mixing steps on h in place: a uint32_t, or a GCC vector of them (the same operations lane by
   lane; the formats kernel's vnoise uses it so) */
#define FQTRUN_LOWBIAS32(h) \
    do { (h) ^= (h) >> 16; (h) *= 0x7FEB352DU; (h) ^= (h) >> 15; (h) *= 0x846CA68BU; (h) ^= (h) >> 16; } while (0)

static inline float noise_at(uint32_t i, uint32_t k1, uint32_t k2) {
    uint32_t h = i ^ k1;
    FQTRUN_LOWBIAS32(h);
    h ^= k2;
    return (float)(int32_t)(h >> 8) * 0x1p-24f;
}

#endif
