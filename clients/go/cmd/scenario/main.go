// Command scenario runs the cross-language e2e scenario (clients/SCENARIO.md) against a live
// gateway: KPG_TARGET (host:port, plaintext), KPG_RUN_ID, KPG_DLT_ERROR. It prints "ok <step>"
// after each step and exits 1 with a message on stderr at the first deviation.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	kpg "github.com/kpg-gateway/kpg/clients/go"
	"github.com/kpg-gateway/kpg/clients/go/kpgv1"
)

const (
	lang         = "go"
	callTimeout  = 30 * time.Second
	watchTimeout = 60 * time.Second
)

func main() {
	target, runID, dltError := os.Getenv("KPG_TARGET"), os.Getenv("KPG_RUN_ID"), os.Getenv("KPG_DLT_ERROR")
	if target == "" || runID == "" || dltError == "" {
		fmt.Fprintln(os.Stderr, "scenario: KPG_TARGET, KPG_RUN_ID and KPG_DLT_ERROR must be set")
		os.Exit(2)
	}
	c, err := kpg.Dial(target)
	if err != nil {
		fail("dial", err)
	}
	defer c.Close()
	s := &scenario{c: c, id: lang + "-" + runID, customer: "c-" + lang, dltError: dltError}
	for _, step := range []struct {
		name string
		run  func() error
	}{
		{"append", s.appendEvent},
		{"wrong-expected-version", s.wrongExpectedVersion},
		{"read-model", s.readModel},
		{"request-reply", s.requestReply},
		{"saga", s.saga},
		{"dead-letters", s.deadLetters},
	} {
		if err := step.run(); err != nil {
			c.Close()
			fail(step.name, err)
		}
		fmt.Println("ok", step.name)
	}
}

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", step, err)
	os.Exit(1)
}

type scenario struct {
	c        *kpg.Client
	id       string // the stream id and the saga id: <lang>-<KPG_RUN_ID>
	customer string
	dltError string
	position string // of the append, for read-your-writes
}

func call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), callTimeout)
}

func (s *scenario) appendRequest() *kpgv1.AppendEventsRequest {
	data, _ := json.Marshal(map[string]any{"customer": s.customer, "total": 42})
	return &kpgv1.AppendEventsRequest{
		Category:    "orders",
		StreamId:    s.id,
		Expectation: &kpgv1.AppendEventsRequest_ExpectedVersion{ExpectedVersion: 0},
		Events:      []*kpgv1.EventData{{Type: "OrderPlaced", Data: data, ContentType: "application/json"}},
	}
}

func (s *scenario) appendEvent() error {
	ctx, cancel := call()
	defer cancel()
	resp, err := s.c.Events.AppendEvents(ctx, s.appendRequest())
	if err != nil {
		return err
	}
	if resp.GetFirstVersion() != 1 || resp.GetPosition() == "" {
		return fmt.Errorf("want first_version 1 and a position, got %v", resp)
	}
	s.position = resp.GetPosition()
	return nil
}

func (s *scenario) wrongExpectedVersion() error {
	ctx, cancel := call()
	defer cancel()
	resp, err := s.c.Events.AppendEvents(ctx, s.appendRequest())
	if err == nil {
		return fmt.Errorf("the second append with expected_version 0 succeeded: %v", resp)
	}
	if code := status.Code(err); code != codes.FailedPrecondition {
		return fmt.Errorf("want FAILED_PRECONDITION, got %v: %w", code, err)
	}
	info := kpg.ErrorInfo(err)
	if info.GetReason() != "WRONG_EXPECTED_VERSION" || info.GetDomain() != "kpg" || info.GetMetadata()["actual"] != "1" {
		return fmt.Errorf("want ErrorInfo reason WRONG_EXPECTED_VERSION, domain kpg, actual 1, got %v (%w)", info, err)
	}
	return nil
}

func (s *scenario) readModel() error {
	ctx, cancel := call()
	defer cancel()
	doc, err := s.c.ReadModels.Get(ctx, &kpgv1.GetDocumentRequest{
		ReadModel: "order_summary", Key: s.id, MinPosition: s.position,
	})
	if err != nil {
		return err
	}
	got := doc.GetData().AsMap()
	want := map[string]any{"status": "PLACED", "customer": s.customer, "total": float64(42)}
	for field, value := range want {
		if got[field] != value {
			return fmt.Errorf("data.%s = %#v, want %#v (document %v)", field, got[field], value, doc)
		}
	}
	if doc.GetVersion() != 1 {
		return fmt.Errorf("version = %d, want 1", doc.GetVersion())
	}
	return nil
}

func (s *scenario) requestReply() error {
	ctx, cancel := call()
	defer cancel()
	reply, err := s.c.Requests.Request(ctx, &kpgv1.RequestMessage{
		Topic: "inventory.requests", Payload: []byte(`{"sku": "apple"}`), TimeoutMs: 10000,
	})
	if err != nil {
		return err
	}
	if reply.GetStatus() != kpgv1.ReplyStatus_REPLY_STATUS_REPLIED {
		return fmt.Errorf("status = %v, want REPLY_STATUS_REPLIED", reply.GetStatus())
	}
	var got any
	if err := json.Unmarshal(reply.GetPayload(), &got); err != nil {
		return fmt.Errorf("reply payload %q is not JSON: %w", reply.GetPayload(), err)
	}
	if want := map[string]any{"sku": "apple", "available": float64(12)}; !reflect.DeepEqual(got, want) {
		return fmt.Errorf("reply payload = %s, want {\"sku\": \"apple\", \"available\": 12}", reply.GetPayload())
	}
	return nil
}

func (s *scenario) saga() error {
	input, err := structpb.NewStruct(map[string]any{"sku": "apple", "quantity": 1, "amount": 10, "customer": s.customer})
	if err != nil {
		return err
	}
	ctx, cancel := call()
	defer cancel()
	started, err := s.c.Sagas.StartSaga(ctx, &kpgv1.StartSagaRequest{SagaType: "place_order", SagaId: s.id, Input: input})
	if err != nil {
		return err
	}
	if started.GetSagaId() != s.id {
		return fmt.Errorf("started saga %q, want %q", started.GetSagaId(), s.id)
	}

	watchCtx, cancelWatch := context.WithTimeout(context.Background(), watchTimeout)
	defer cancelWatch()
	stream, err := s.c.Sagas.WatchSaga(watchCtx, &kpgv1.WatchSagaRequest{SagaId: s.id})
	if err != nil {
		return err
	}
	for {
		saga, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return errors.New("WatchSaga ended before the saga completed")
		}
		if err != nil {
			return fmt.Errorf("WatchSaga: %w", err)
		}
		switch saga.GetStatus() {
		case kpgv1.SagaStatus_SAGA_STATUS_COMPLETED:
			return nil
		case kpgv1.SagaStatus_SAGA_STATUS_FAILED, kpgv1.SagaStatus_SAGA_STATUS_COMPENSATED:
			return fmt.Errorf("saga ended %v: %s", saga.GetStatus(), saga.GetFailureReason())
		}
	}
}

func (s *scenario) deadLetters() error {
	request := &kpgv1.ListDeadLettersRequest{DltTopic: "orders.events.DLT"}
	for {
		ctx, cancel := call()
		page, err := s.c.DeadLetters.ListDeadLetters(ctx, request)
		cancel()
		if err != nil {
			return err
		}
		for _, letter := range page.GetDeadLetters() {
			if letter.GetOriginalTopic() == "orders.events" && letter.GetErrorMessage() == s.dltError {
				return nil
			}
		}
		if page.GetNextPageToken() == "" {
			return fmt.Errorf("no dead letter from orders.events with error message %q", s.dltError)
		}
		request.PageToken = page.GetNextPageToken()
	}
}
