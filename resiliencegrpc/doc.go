// Package resiliencegrpc protects gRPC clients and servers with the
// policies of a [resilience.Registry]: the same breakers, retries,
// timeouts, bulkheads, rate limits, variables and metrics as the
// registry's HTTP clients, through the one call pipeline every entry point
// of package resilience runs.
//
// It is a module of its own, so that the core never downloads gRPC:
//
//	go get github.com/resilience-go/resilience/resiliencegrpc
//
// A client:
//
//	reg := resilience.Default() // from CIRCUIT_BREAKER_*, RETRY_*, TIMEOUT_*, BULKHEAD_*
//	conn, err := grpc.NewClient(target,
//		grpc.WithChainUnaryInterceptor(resiliencegrpc.UnaryClientInterceptor(reg)),
//		grpc.WithChainStreamInterceptor(resiliencegrpc.StreamClientInterceptor(reg)))
//
// Each call runs through the pipeline of its gRPC service
// ("openfga.v1.OpenFGAService", whose variables read
// CIRCUIT_BREAKER_OPENFGA_V1_OPENFGASERVICE_FAIL_MAX and so on), with the
// status rules of [UnaryClientInterceptor]. A server sheds what it cannot
// serve with [UnaryServerInterceptor]:
//
//	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(resiliencegrpc.UnaryServerInterceptor(reg.Bulkhead("server"))))
//
// The interceptors work beside otelgrpc's stats handlers, which see every
// attempt, while resilience.calls counts each call once.
package resiliencegrpc
