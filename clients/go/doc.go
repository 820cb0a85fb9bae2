// Package kpg is the Go client of the Kafka Pattern Gateway.
//
// The gRPC API itself is the generated package [github.com/kpg-gateway/kpg/clients/go/kpgv1]
// (from proto/kpg/v1; never edited by hand). This package only removes the friction around it:
// [Dial] opens one connection with a client per service, and [ErrorInfo] and [IsReason] read the
// contract's error reason (google.rpc.ErrorInfo, domain "kpg") from a failed call.
//
//	c, err := kpg.Dial("127.0.0.1:50051")
//	if err != nil { ... }
//	defer c.Close()
//	_, err = c.Events.AppendEvents(ctx, &kpgv1.AppendEventsRequest{...})
//	if kpg.IsReason(err, "WRONG_EXPECTED_VERSION") {
//		actual := kpg.ErrorInfo(err).GetMetadata()["actual"]
//	}
package kpg
