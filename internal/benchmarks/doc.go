// Package benchmarks compares resilience with the libraries users would
// otherwise pick, and with the same policies written by hand, in one
// `go test -bench` run.
//
// It is a module of its own, as zap keeps its benchmarks/, so that
// failsafe-go and the other competitors never enter the module graph of
// resilience's users. It holds only tests; README.md gives the command that
// reproduces the comparison.
package benchmarks
