package kpg

import (
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of every error the gateway returns.
const ErrorDomain = "kpg"

// ErrorInfo returns the google.rpc.ErrorInfo (domain "kpg") that the gateway attaches to every
// failed call, or nil if err carries none (nil, not a gRPC status, or from elsewhere).
// err may be wrapped. Its Reason is the contract's reason ("WRONG_EXPECTED_VERSION",
// "NOT_FOUND", ...) and Metadata its context (e.g. "expected" and "actual"); the getters are
// nil-safe, so kpg.ErrorInfo(err).GetReason() is "" when there is none.
func ErrorInfo(err error) *errdetails.ErrorInfo {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	for _, detail := range st.Proto().GetDetails() {
		info := &errdetails.ErrorInfo{}
		if detail.MessageIs(info) && detail.UnmarshalTo(info) == nil && info.GetDomain() == ErrorDomain {
			return info
		}
	}
	return nil
}

// IsReason reports whether err is a gateway error with the given contract reason,
// e.g. kpg.IsReason(err, "WRONG_EXPECTED_VERSION").
func IsReason(err error, reason string) bool {
	info := ErrorInfo(err)
	return info != nil && info.GetReason() == reason
}
