package kpg

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kpg-gateway/kpg/clients/go/kpgv1"
)

// Client holds one connection to a gateway and a client for each of its five services.
// It is safe for concurrent use; Close it when done.
type Client struct {
	Events      kpgv1.EventStoreClient
	ReadModels  kpgv1.ReadModelsClient
	Sagas       kpgv1.SagasClient
	Requests    kpgv1.RequestReplyClient
	DeadLetters kpgv1.DeadLettersClient

	conn *grpc.ClientConn
}

// Dial returns a Client for the gateway at target ("host:port", or any gRPC target name).
//
// The connection is plaintext, as the gateway serves it, unless opts give transport credentials
// (grpc.WithTransportCredentials): opts are applied after that default. Like grpc.NewClient,
// Dial does not connect; the first call does, and fails with codes.Unavailable if it cannot.
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{
		Events:      kpgv1.NewEventStoreClient(conn),
		ReadModels:  kpgv1.NewReadModelsClient(conn),
		Sagas:       kpgv1.NewSagasClient(conn),
		Requests:    kpgv1.NewRequestReplyClient(conn),
		DeadLetters: kpgv1.NewDeadLettersClient(conn),
		conn:        conn,
	}, nil
}

// Conn returns the underlying connection, e.g. for the grpc.health.v1 service.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close closes the connection; calls in flight fail with codes.Canceled.
func (c *Client) Close() error { return c.conn.Close() }
