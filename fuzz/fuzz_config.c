/* libFuzzer harness: config.json text either fails cleanly or yields a config that validates. */
#include "ot_model_config.h"
#include "ot_error.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  ot_model_config cfg;
  if (ot_model_config_parse((const char *)data, size, &cfg) != OT_OK) return 0;
  if (ot_model_config_validate(&cfg) != OT_OK) abort();
  return 0;
}
