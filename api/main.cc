#include <cstdio>
int main() { std::puts("qcal: under construction"); return 0; }
