package io.kpg.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.protobuf.Any;
import com.google.rpc.BadRequest;
import com.google.rpc.Code;
import com.google.rpc.ErrorInfo;
import com.google.rpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.util.Map;
import org.junit.jupiter.api.Test;

class KpgErrorsTest {

    /** What the gateway sends: a google.rpc.Status in the grpc-status-details-bin trailer. */
    private static StatusRuntimeException error(Code code, com.google.protobuf.Message... details) {
        Status.Builder status = Status.newBuilder().setCode(code.getNumber()).setMessage("test");
        for (com.google.protobuf.Message detail : details) {
            status.addDetails(Any.pack(detail));
        }
        return StatusProto.toStatusRuntimeException(status.build());
    }

    @Test
    void decodesReasonAndMetadata() {
        StatusRuntimeException e = error(Code.FAILED_PRECONDITION, ErrorInfo.newBuilder()
                .setDomain("kpg")
                .setReason("WRONG_EXPECTED_VERSION")
                .putMetadata("expected", "0")
                .putMetadata("actual", "1")
                .build());

        assertEquals(io.grpc.Status.Code.FAILED_PRECONDITION, e.getStatus().getCode());
        assertEquals("WRONG_EXPECTED_VERSION", KpgErrors.reason(e));
        assertEquals(Map.of("expected", "0", "actual", "1"), KpgErrors.metadata(e));
        assertEquals("kpg", KpgErrors.errorInfo(e).orElseThrow().getDomain());
    }

    @Test
    void survivesTheTrailerRoundTrip() {
        StatusRuntimeException sent = error(Code.RESOURCE_EXHAUSTED, ErrorInfo.newBuilder()
                .setDomain("kpg").setReason("RATE_LIMITED").putMetadata("retry_after_ms", "250").build());
        // What a client sees: status and trailers only, as decoded from the wire.
        StatusRuntimeException received = new StatusRuntimeException(sent.getStatus(), sent.getTrailers());

        assertEquals("RATE_LIMITED", KpgErrors.reason(received));
        assertEquals("250", KpgErrors.metadata(received).get("retry_after_ms"));
    }

    @Test
    void picksTheKpgErrorInfoAndReadsBadRequest() {
        StatusRuntimeException e = error(Code.INVALID_ARGUMENT,
                ErrorInfo.newBuilder().setDomain("googleapis.com").setReason("OTHER").build(),
                BadRequest.newBuilder().addFieldViolations(BadRequest.FieldViolation.newBuilder()
                        .setField("stream_id").setDescription("must not be empty")).build(),
                ErrorInfo.newBuilder().setDomain("kpg").setReason("INVALID_ARGUMENT").build());

        assertEquals("INVALID_ARGUMENT", KpgErrors.reason(e));
        assertEquals(Map.of("stream_id", "must not be empty"), KpgErrors.fieldViolations(e));
    }

    @Test
    void emptyWithoutDetails() {
        StatusRuntimeException plain = io.grpc.Status.UNAVAILABLE.withDescription("down").asRuntimeException();
        StatusRuntimeException foreign = error(Code.NOT_FOUND,
                ErrorInfo.newBuilder().setDomain("example.com").setReason("NOT_FOUND").build());

        assertEquals("", KpgErrors.reason(plain));
        assertTrue(KpgErrors.metadata(plain).isEmpty());
        assertTrue(KpgErrors.fieldViolations(plain).isEmpty());
        assertEquals("", KpgErrors.reason(foreign));
        assertTrue(KpgErrors.errorInfo(foreign).isEmpty());
    }
}
