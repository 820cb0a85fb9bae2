// Command first_call appends an event to a new stream and reads the stream back.
//
//	go run ./examples/first_call        # KPG_TARGET defaults to 127.0.0.1:50051
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	kpg "github.com/kpg-gateway/kpg/clients/go"
	"github.com/kpg-gateway/kpg/clients/go/kpgv1"
)

func main() {
	target := os.Getenv("KPG_TARGET")
	if target == "" {
		target = "127.0.0.1:50051"
	}
	c, err := kpg.Dial(target)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	streamID := fmt.Sprintf("example-%d", time.Now().UnixNano())
	appended, err := c.Events.AppendEvents(ctx, &kpgv1.AppendEventsRequest{
		Category:    "orders",
		StreamId:    streamID,
		Expectation: &kpgv1.AppendEventsRequest_ExpectedState{ExpectedState: kpgv1.ExpectedState_EXPECTED_STATE_NO_STREAM},
		Events: []*kpgv1.EventData{
			{Type: "OrderPlaced", Data: []byte(`{"customer": "c-1", "total": 42}`)},
		},
	})
	if kpg.IsReason(err, "WRONG_EXPECTED_VERSION") {
		log.Fatalf("stream %s already exists (version %s)", streamID, kpg.ErrorInfo(err).GetMetadata()["actual"])
	} else if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("appended orders/%s version %d at %s\n", streamID, appended.GetLastVersion(), appended.GetPosition())

	// min_position: read our own write even if the stream index has not caught up yet.
	read, err := c.Events.ReadStream(ctx, &kpgv1.ReadStreamRequest{
		Category: "orders", StreamId: streamID, MinPosition: appended.GetPosition(),
	})
	if err != nil {
		log.Fatal(err)
	}
	for _, event := range read.GetEvents() {
		fmt.Printf("v%d %s %s %s\n", event.GetVersion(), event.GetType(), event.GetData(),
			event.GetRecordedAt().AsTime().Format(time.RFC3339Nano))
	}
}
