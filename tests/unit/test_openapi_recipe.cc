// api/openapi.yaml's recipe schema is generated from the method registry
// (`qcal registry --openapi`, recipe_openapi_yaml): the block between its
// "BEGIN generated" / "END generated" markers must equal the generator's output,
// so a registry row changed without regenerating the API description fails here.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

#include "common/method_registry.h"

namespace qcal {
namespace {

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(OpenApiRecipe, TheSchemaIsTheRegistrys) {
  const std::string yaml = read_all(std::string(QCAL_SOURCE_DIR) + "/api/openapi.yaml");
  ASSERT_FALSE(yaml.empty());
  const std::string begin_marker = "    # BEGIN generated:";
  const std::string end_marker = "    # END generated\n";
  const size_t b = yaml.find(begin_marker);
  ASSERT_NE(b, std::string::npos) << "no BEGIN generated marker in api/openapi.yaml";
  const size_t body = yaml.find("    Recipe:\n", b);
  const size_t e = yaml.find(end_marker, b);
  ASSERT_NE(body, std::string::npos);
  ASSERT_NE(e, std::string::npos);
  ASSERT_LT(body, e);
  const std::string embedded = yaml.substr(body, e - body);
  const std::string generated = recipe_openapi_yaml();
  EXPECT_EQ(embedded, generated)
      << "api/openapi.yaml's recipe schema is stale: regenerate it with "
         "`qcal registry --openapi` and paste it between the markers";
  // Every registry option appears in it (nested keys by their last part).
  for (const MethodRow& r : method_registry())
    for (const OptionSpec& o : r.options) {
      const size_t dot = o.key.find('.');
      const std::string name = dot == std::string::npos ? o.key : o.key.substr(dot + 1);
      EXPECT_NE(generated.find(" " + name + ":\n"), std::string::npos) << o.key;
    }
}

}  // namespace
}  // namespace qcal
