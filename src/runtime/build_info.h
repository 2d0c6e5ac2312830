// What this binary was built with and what it sees at run time (printed by dsv4-info and at the start
// of every tool).
#pragma once

#include <string>

namespace dsv4 {
std::string build_info();
}
