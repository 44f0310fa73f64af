// The 64-byte tile configuration LDTILECFG reads (palette 1), shared by the
// bf16 and the int8 AMX kernels; each fills in its own tile shapes.
#pragma once

#include <cstdint>

namespace cnuma {
namespace experts {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace experts
}  // namespace cnuma
