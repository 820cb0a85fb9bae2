package kpg_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	kpg "github.com/kpg-gateway/kpg/clients/go"
	"github.com/kpg-gateway/kpg/clients/go/kpgv1"
)

// wrongVersion builds the error the gateway returns for a failed optimistic-concurrency check.
func wrongVersion(t *testing.T) error {
	t.Helper()
	st, err := status.New(codes.FailedPrecondition, "stream orders/o-1 is at version 1").WithDetails(
		&errdetails.BadRequest{}, // another detail first: ErrorInfo is found wherever it is
		&errdetails.ErrorInfo{Domain: "other", Reason: "NOT_OURS"},
		&errdetails.ErrorInfo{
			Domain:   "kpg",
			Reason:   "WRONG_EXPECTED_VERSION",
			Metadata: map[string]string{"expected": "0", "actual": "1"},
		},
	)
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func TestErrorInfo(t *testing.T) {
	err := wrongVersion(t)
	for name, err := range map[string]error{"plain": err, "wrapped": fmt.Errorf("append: %w", err)} {
		t.Run(name, func(t *testing.T) {
			info := kpg.ErrorInfo(err)
			if info.GetReason() != "WRONG_EXPECTED_VERSION" || info.GetDomain() != kpg.ErrorDomain {
				t.Fatalf("ErrorInfo = %v, want reason WRONG_EXPECTED_VERSION in domain kpg", info)
			}
			if got := info.GetMetadata(); got["expected"] != "0" || got["actual"] != "1" || len(got) != 2 {
				t.Fatalf("metadata = %v, want expected=0 actual=1", got)
			}
			if !kpg.IsReason(err, "WRONG_EXPECTED_VERSION") || kpg.IsReason(err, "NOT_FOUND") {
				t.Fatal("IsReason disagrees with ErrorInfo")
			}
		})
	}
}

func TestErrorInfoWithoutDetail(t *testing.T) {
	foreign, _ := status.New(codes.NotFound, "x").WithDetails(&errdetails.ErrorInfo{Domain: "other", Reason: "NOT_FOUND"})
	for name, err := range map[string]error{
		"nil":            nil,
		"not a status":   errors.New("boom"),
		"no details":     status.Error(codes.Unavailable, "connection refused"),
		"foreign domain": foreign.Err(),
	} {
		t.Run(name, func(t *testing.T) {
			if info := kpg.ErrorInfo(err); info != nil {
				t.Fatalf("ErrorInfo = %v, want nil", info)
			}
			if kpg.ErrorInfo(err).GetReason() != "" || kpg.IsReason(err, "NOT_FOUND") {
				t.Fatal("a missing ErrorInfo must read as no reason")
			}
		})
	}
}

// failingEventStore answers every append with the given error.
type failingEventStore struct {
	kpgv1.UnimplementedEventStoreServer
	err error
}

func (s failingEventStore) AppendEvents(context.Context, *kpgv1.AppendEventsRequest) (*kpgv1.AppendEventsResponse, error) {
	return nil, s.err
}

// TestDialDecodesTrailer sends the error through a real gRPC server and client made by Dial, so
// the ErrorInfo travels in the grpc-status-details-bin trailer as it does from the gateway.
func TestDialDecodesTrailer(t *testing.T) {
	listener := bufconn.Listen(1 << 20)
	server := grpc.NewServer()
	kpgv1.RegisterEventStoreServer(server, failingEventStore{err: wrongVersion(t)})
	go func() { _ = server.Serve(listener) }()
	defer server.Stop()

	c, err := kpg.Dial("passthrough:///bufnet", grpc.WithContextDialer(
		func(ctx context.Context, _ string) (net.Conn, error) { return listener.DialContext(ctx) }))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	_, err = c.Events.AppendEvents(t.Context(), &kpgv1.AppendEventsRequest{Category: "orders", StreamId: "o-1"})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("code = %v, want FailedPrecondition (err %v)", status.Code(err), err)
	}
	if !kpg.IsReason(err, "WRONG_EXPECTED_VERSION") || kpg.ErrorInfo(err).GetMetadata()["actual"] != "1" {
		t.Fatalf("ErrorInfo = %v", kpg.ErrorInfo(err))
	}
}
