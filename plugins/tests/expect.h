/*
 * The bookkeeping of the C++ test programs in plugins/tests: expect() counts each check, and
 * report() prints "N passed, M failed" (what pytest reads) and gives the exit status.
 */
#ifndef MRA_PLUGIN_TESTS_EXPECT_H
#define MRA_PLUGIN_TESTS_EXPECT_H

#include <cstdio>

namespace checks
{

inline int gPassed = 0;
inline int gFailed = 0;

inline void expect(bool condition, char const* what)
{
    if (condition)
    {
        ++gPassed;
    }
    else
    {
        ++gFailed;
        std::printf("FAILED: %s\n", what);
    }
}

inline int report()
{
    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}

} // namespace checks

#endif // MRA_PLUGIN_TESTS_EXPECT_H
