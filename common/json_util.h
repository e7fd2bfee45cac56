// Guards for parsing untrusted JSON (safetensors headers, config and index
// files, REST bodies).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace qcal {

// The byte offset at which arrays/objects in `text` first nest deeper than
// `limit`, or std::string::npos. Checked before parsing: nlohmann builds (and
// destroys, recursively) arbitrarily deep values, so a small hostile input
// could otherwise cost gigabytes or overflow a thread's stack. A linear scan
// that respects strings and escapes; it does not validate the JSON.
size_t json_nesting_exceeds(std::string_view text, int limit);

}  // namespace qcal
